mod realservers;
